"""Results schema, image grids and leaderboards."""
