"""Names the config validates against, kept free of torch so that loading a config stays instant.

``TRANSPORTS`` maps a ``sync.transport`` value to the dotted path of its ``WeightTransport`` class;
``asyncrl.sync.transport.build_transport`` imports the class only when a worker builds one.
"""

TRANSPORTS: dict[str, str] = {
    "broadcast": "asyncrl.sync.broadcast:BroadcastTransport",
    "store": "asyncrl.sync.store_transport:StoreTransport",
    "shm": "asyncrl.sync.shm_transport:ShmTransport",
}

SYNC_MODES: tuple[str, ...] = ("inflight", "pause")
