#!/bin/sh
# Entrypoint of the redis stand-in image: the official image's behaviour.
set -e

# The first argument is an option or a config file: run redis-server with them.
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi

if [ "$1" = 'redis-server' ] && [ "$(id -u)" = '0' ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi

if [ "$1" = 'redis-server' ]; then
    # The official image's server is built with protected mode off by default; Debian's is
    # not. Turn it off unless the command line or the config file says otherwise.
    said=""
    for arg in "$@"; do
        case "$arg" in
            --protected-mode) said=1 ;;
            *.conf) if [ -f "$arg" ] && grep -qi '^[[:space:]]*protected-mode' "$arg"; then said=1; fi ;;
        esac
    done
    if [ -z "$said" ]; then
        set -- "$@" --protected-mode no
    fi
fi

exec "$@"
