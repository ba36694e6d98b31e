"""What a user runs beside the relay: the streaming probe, the demo, the SGLang-like streamer."""
