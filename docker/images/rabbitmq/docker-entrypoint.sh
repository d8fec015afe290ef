#!/usr/bin/env bash
# Entrypoint of the rabbitmq stand-in image: the official image's behaviour.
set -Eeo pipefail

if [ "$(id -u)" = '0' ] && [ "${1:-}" = 'rabbitmq-server' ]; then
    chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /etc/rabbitmq /var/log/rabbitmq
    exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "$BASH_SOURCE" "$@"
fi

if [ "${1:-}" = 'rabbitmq-server' ]; then
    # The variables the official image documents, written where the server reads its
    # settings (later files in conf.d win over the defaults).
    conf=/etc/rabbitmq/conf.d/20-environment.conf
    : > "$conf"
    [ -n "${RABBITMQ_DEFAULT_USER:-}" ] && echo "default_user = $RABBITMQ_DEFAULT_USER" >> "$conf"
    [ -n "${RABBITMQ_DEFAULT_PASS:-}" ] && echo "default_pass = $RABBITMQ_DEFAULT_PASS" >> "$conf"
    [ -n "${RABBITMQ_DEFAULT_VHOST:-}" ] && echo "default_vhost = $RABBITMQ_DEFAULT_VHOST" >> "$conf"
    if [ ! -f "$HOME/.erlang.cookie" ]; then
        head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$HOME/.erlang.cookie"
        chmod 400 "$HOME/.erlang.cookie"
    fi
fi

exec "$@"
