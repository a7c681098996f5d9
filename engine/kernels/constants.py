"""Names shared by every layer that makes or reads labels.

The kernels are the ground floor of the project (data/ and engine/ import them, never the
other way round), so the one definition lives here.
"""

# A label equal to this is not trained or scored: padding, a document's last position.
# The same value as torch.nn.functional.cross_entropy's default.
IGNORE_INDEX = -100
