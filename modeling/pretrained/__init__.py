"""Frozen pretrained parts behind their own loaders: DAC (codec), Flan-T5 (text_encoder), HTDemucs (separator),
their tiny random stand-ins (tiny) and the error a missing weight raises (errors)."""
