"""sms: text messages to customers, sent only through bridge's outbox.

- :mod:`sms.numbers`: mobile numbers as E.164, refusals with reason codes.
- :mod:`sms.policy`: :class:`~sms.policy.SmsPolicy`, the recipient policy (fraud limits in Redis).
- :mod:`sms.kannel`: :class:`~sms.kannel.KannelGateway` and Kannel's delivery reports (sign, verify, parse).
- :mod:`sms.http_gateway`: :class:`~sms.http_gateway.HttpSmsGateway`, a provider's HTTP API from configuration.
- :mod:`sms.kannel_proc`: local Kannel instances (bearerbox, smsbox, fake SMSC) for development and tests.
"""
