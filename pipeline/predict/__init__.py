"""Test predictions with TTA; the submission writer and validator."""
