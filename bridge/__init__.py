"""RabbitMQ bridge workers: a small host that runs plugin-style workers beside RabbitMQ."""

__version__ = "0.1.0"
