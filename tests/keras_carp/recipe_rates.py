"""The recipe's per-view probabilities, checked on measured rates (shared by the host and device recipes).

Each argument is a per-view rate: the share of images in which the operation changed the view,
measured on the outputs (views: global 1, global 2, then the local crops).
"""

import numpy as np


def check_solarisation(rates):
    """Solarisation: only the second global view, 20% of the time."""
    assert rates[0] == 0 and np.all(rates[2:] == 0), rates
    assert 0.15 < rates[1] < 0.25, rates


def check_grayscale(rates):
    """Grayscale: 20% of every view."""
    assert np.all((rates > 0.15) & (rates < 0.25)), rates


def check_blur(rates):
    """Gaussian blur: always on view 1, 10% of view 2, half of the local crops."""
    assert rates[0] == 1.0, rates
    assert 0.06 < rates[1] < 0.14, rates
    assert np.all((rates[2:] > 0.44) & (rates[2:] < 0.56)), rates


def check_colour_jitter(rates):
    """Colour jitter: 80% of every view."""
    assert np.all((rates > 0.75) & (rates < 0.85)), rates
