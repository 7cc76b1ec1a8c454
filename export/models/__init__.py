"""The two joint networks: jcs2d (2.5D) and deepsc3d (3D)."""
