"""Side-by-side curvature benchmark: eqlab against its peers (issue 4). Not part of the eqlab package."""
