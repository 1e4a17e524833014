"""ensc.engine"""
