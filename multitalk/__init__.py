"""InfiniteTalk / MultiTalk audio conditioning and the long-video loop."""
