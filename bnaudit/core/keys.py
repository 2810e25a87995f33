"""Keys that cross stages as plain strings, defined once.

No torch here: the verdict reads these keys in measured metrics without importing the code that
measured them.
"""

ACTIVATION_KEY = "act:"  # diagnosis keys of BN-with-activation layers (bnaudit.measure.explain)
