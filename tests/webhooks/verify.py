"""Verifies webhook requests with the Standard Webhooks reference library.

Usage: verify.py <whsec_ secret> <requests.json>
The JSON file is a list of {"headers": {...}, "body": "..."}. Every request
must verify; the same request with one byte of its body changed, and with
another secret, must not. Prints "verified <n>".
"""
import json
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

secret, path = sys.argv[1], sys.argv[2]
requests = json.load(open(path))
good = Webhook(secret)
other = Webhook("whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB")
for req in requests:
    headers, body = req["headers"], req["body"]
    good.verify(body, headers)
    for verifier, payload in ((good, body + " "), (other, body)):
        try:
            verifier.verify(payload, headers)
        except WebhookVerificationError:
            continue
        sys.exit(f"a forged request verified: {headers['webhook-id']}")
print(f"verified {len(requests)}")
