"""Who may connect and whom they may send as."""
