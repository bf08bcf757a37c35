# The local cloud needs no provider plugin: `terraform_data` and `local-exec` are built into
# Terraform itself, so this module works offline and with the engine embedded in skyhedge.
terraform {
  required_version = ">= 1.5.0, < 2.0.0"
}
