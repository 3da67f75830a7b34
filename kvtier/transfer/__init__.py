"""The transfer channel between instances: chunks peer to peer, prefill to decode.

``wire`` (framing: HELLO, CONTAINS, GET; sizes bounded before allocation), ``client``
(pooled connections the peer tier reads through), ``server`` (serves an instance's
own tiers to its peers).
"""
