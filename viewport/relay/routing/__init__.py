"""
The parts of the router, each a small object with its collaborators passed in.

``viewport.relay.router.Router`` composes them; arrows point one way: the pipelines and the
lifecycle use ``Delivery`` and ``Refusals``, the client pipeline hands frames without a local
daemon to ``RemoteForwarding``, and ``BusInbound`` routes daemon frames through the daemon pipeline.
"""
