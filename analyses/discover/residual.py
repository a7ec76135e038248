"""Pre-LN residual stream: joint scale and per-row translations (catalog rows 3a, 3b, 4a, 4b). Placeholder
until implemented."""


def residual_stream(graph):
    return []
