"""The model: networks and their layers, losses, EMA, the schedule in images seen, the config,
the plain-dict checkpoint file and what reads a generator and draws a grid out of it. Plain
torch: no Ray, no data pipeline (tests/test_layers.py keeps it so)."""
