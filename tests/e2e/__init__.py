"""End-to-end tests of the whole loop (devices → bridge → agents → trainer → devices)."""
