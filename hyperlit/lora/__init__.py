"""Hypernetworks as LoRAs: fit each touched attention layer on real inputs and write kohya or diffusers files."""
