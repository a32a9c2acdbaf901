"""The cluster side: joining Oakestra over HTTP and speaking its MQTT gateway topics."""
