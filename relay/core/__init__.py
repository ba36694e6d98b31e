"""The proxy core: listeners, client and upstream connections, the exchange
between them, and the state they share (imports only ``relay.http`` and ``relay.config``)."""
