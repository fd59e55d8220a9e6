"""The bottom layer: settings, errors, logging and the pure rules every other layer relies on
(text, hostnames, the reference guard, credentials). Imports nothing else of ``worker``."""
