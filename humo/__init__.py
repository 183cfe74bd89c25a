"""HuMo: Whisper audio conditioning on the Wan backbone."""
