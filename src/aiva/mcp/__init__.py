"""MCP (Model Context Protocol): sandboxes as MCP tools (``aiva mcp serve``), and any stdio
MCP server run inside a sandbox (``aiva mcp run``), with every message audited."""
