"""The stage bodies: one module per DVC stage, each a function the thin script in stages/ calls."""
