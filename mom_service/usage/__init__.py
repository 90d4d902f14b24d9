"""Usage records: the database (SQLite or PostgreSQL), its numbered migrations, the queued writer, the usage report
and the money formats. The only package that speaks SQL."""
