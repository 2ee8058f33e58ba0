// The console page's script (placeholder).
