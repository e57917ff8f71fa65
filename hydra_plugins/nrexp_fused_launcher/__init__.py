"""nrexp's Hydra launcher `hydra/launcher=fused` (see fused_launcher.py). Hydra finds it by scanning
the `hydra_plugins` namespace package, which has no __init__.py of its own so that every installed
plugin can add to it."""
