"""The AWS cloud: render inputs (render.py), events and reconcile (events.py), setup (setup.py)."""
