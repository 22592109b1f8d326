"""The shared base: pieces every part of the project builds on (the user-error type and CLI
runner, local and object-storage paths with atomic writes, port checks). It imports nothing of
ours and knows nothing of faces, GANs or Ray Train (tests/test_layers.py keeps it so)."""
