"""The demo and its local broker.

``scenario``: ``rnnsentry demo`` (train, start mosquitto and the daemon, replay a fleet
with anomalies, summarise). ``localbroker``: mosquitto on a free loopback port, shared by
the demo, the tests and the benchmarks; never used by ``rnnsentry run``.
"""
