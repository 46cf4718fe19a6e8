"""email_out: follow-ups by email, sent only through bridge's outbox.

- ``email_out.message``: the MIME message (text + HTML, UTF-8, a Message-ID stable across attempts).
- ``email_out.address``: address normal form and ``EmailPolicy`` (the email ``RecipientPolicy``).
- ``email_out.smtp``: ``SmtpGateway`` (the email ``Gateway``): pooled aiosmtplib connections, DATA split at the dot.
- ``email_out.devsink``: the dev mail sink (aiosmtpd) for ``make run`` and the tests.

Modules are imported by name (nothing is re-exported here), so ``python -m email_out.devsink`` runs cleanly.
"""
