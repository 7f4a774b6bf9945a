"""Fleets: MeZO on many devices, one model (`ortzo federate`).

A MeZO step is its seed and projected gradient: a few bytes where federated averaging ships
the weights. Devices probe from the same weights on their own data and send records; the
server merges them into one global step log that every device replays (coordinator.py,
replica.py), over Flower's messages (flower.py), by a plan of slots and shards (plan.py).
"""
