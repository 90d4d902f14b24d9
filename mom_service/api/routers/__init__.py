"""One router per surface: what each endpoint validates, asks the engine, and hands to its encoder."""
