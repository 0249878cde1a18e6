"""The relay process: configuration, upgrade, admission, routing and the twistd service."""
