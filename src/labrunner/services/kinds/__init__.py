"""The services labrunner runs, one file each; importing a file registers its kind (see
:class:`labrunner.services.base.ServiceKind`). The order here is the order a run starts them.
A new service: one file beside these, and its name in this import."""

from . import postgres, redis, kafka, rabbitmq, prometheus  # noqa: F401, I001 - the order matters
