//! Placeholder: the dashboard overview benchmark (100,000 machines, SQLite and PostgreSQL)
//! lands in the next commit.
fn main() {}
