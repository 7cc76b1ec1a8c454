"""Scanner-side tools: send series to the gateway, render results. Never imports torch."""
