"""The upstream side: backends (health, discovery, scraping), engine metric dialects, the HTTP
transport, and the byte-faithful relay. Nothing here decides retries or admission."""
