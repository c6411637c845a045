"""What the API and the workers share: settings, database tables, job queries, artifact store."""
