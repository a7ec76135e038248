"""The equivariance toolbox: transformations, identity checks and curvature. Plain PyTorch only."""
