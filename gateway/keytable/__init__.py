"""keytable"""
