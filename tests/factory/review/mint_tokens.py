"""Run by Label Studio's own Python (the fixture's venv): make reviewer accounts in the server's
organisation and print a personal access token for each, as JSON on stdout.

    python mint_tokens.py DATA_DIR EMAIL [EMAIL ...]

The same tokens a person copies from Account & Settings > Personal Access Token (LSAPIToken).
"""

import json
import os
import sys
from pathlib import Path

import label_studio

sys.path.insert(0, str(Path(label_studio.__file__).parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "core.settings.label_studio")
os.environ["LABEL_STUDIO_BASE_DATA_DIR"] = sys.argv[1]

import django  # noqa: E402

django.setup()

from jwt_auth.models import LSAPIToken  # noqa: E402
from organizations.models import Organization  # noqa: E402
from users.models import User  # noqa: E402

organisation = Organization.objects.first()
tokens = {}
for email in sys.argv[2:]:
    user, created = User.objects.get_or_create(email=email, defaults={"username": email})
    if created:
        user.set_unusable_password()
    organisation.add_user(user)
    user.active_organization = organisation
    user.save()
    tokens[email] = LSAPIToken.for_user(user).get_full_jwt()
print(json.dumps(tokens))
