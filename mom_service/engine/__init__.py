"""The engine: one request type in (a Plan, made from an engine Request), one event stream out. It knows no HTTP and
no protocol's shapes: it plans who is asked, fans out, applies the panel rules, concludes, and records each call."""
