"""The `gpuhost` command line: the client, the operator's commands, the dev stack. The only
package allowed to import everything (../shared/DESIGN.md)."""
