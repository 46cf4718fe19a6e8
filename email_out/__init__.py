"""email_out: arrives with a later issue (see DESIGN.md)."""
