"""Helpers behind the AMP transformer notebooks: validate, analyze, train and benchmark."""
