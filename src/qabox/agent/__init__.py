"""The qabox host agent: stdlib only, python 3.6+, shipped to the host as one .pyz (see qabox.agent_zip)."""
