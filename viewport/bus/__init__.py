"""viewport-bus: the self-hosted platform side of server mode (validate, presence, bus) on PostgreSQL."""
