"""The GCP cloud: render inputs (render.py), zone operations and instance status (events.py)."""
